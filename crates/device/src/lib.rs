//! Where bytes go: load targets (filled by the loader issue).
