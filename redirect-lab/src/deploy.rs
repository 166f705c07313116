//! What the lab reads from the repository's `deploy/` manifests.

use std::path::Path;

use anyhow::{Context as _, Result};

/// The redirectd image the manifests run (`deploy/base`), by name: the image `cargo xtask
/// image` builds is tagged with it, so the manifests need no change.
pub fn manifest_image(repo: &Path) -> Result<String> {
    let path = repo.join("deploy/base/redirectd.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("image: "))
        .map(str::trim)
        .find(|i| i.contains("redirectd"))
        .map(String::from)
        .with_context(|| format!("no redirectd image in {}", path.display()))
}
