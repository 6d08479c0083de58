//! Where bytes come from: readable byte sources (filled by the loader issue).
