//! Small readers of `/proc`.

/// The process ids in `/proc` (its numeric entries). Processes may exit while the caller
/// reads their entries: every reader of `/proc/PID/...` must expect them to be gone.
pub fn pids() -> impl Iterator<Item = String> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flat_map(|d| d.flatten())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}
