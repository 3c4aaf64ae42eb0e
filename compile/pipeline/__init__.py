"""Stage bookkeeping shared by every backend: work dir, resumable stages, signals, progress, disk."""
