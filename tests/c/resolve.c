/* getaddrinfo() for one name, IPv4: prints each address on a line. Built with musl-gcc by
 * tests/tests/dns.rs, to run musl's resolver (unconnected sendto/recvfrom, reply source
 * checked against the nameserver) against DNS capture. */
#include <arpa/inet.h>
#include <netdb.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    struct addrinfo hints, *res, *p;
    if (argc != 2) return 2;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(argv[1], NULL, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "getaddrinfo: %s\n", gai_strerror(rc));
        return 1;
    }
    for (p = res; p; p = p->ai_next) {
        char buf[INET_ADDRSTRLEN];
        struct sockaddr_in *sin = (struct sockaddr_in *)p->ai_addr;
        printf("%s\n", inet_ntop(AF_INET, &sin->sin_addr, buf, sizeof buf));
    }
    freeaddrinfo(res);
    return 0;
}
