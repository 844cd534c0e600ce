"""One-off investigations behind docs/MEASUREMENTS.md and docs/PRESET.md: each script reproduces the
measurement the docs cite. Not maintained as the defense changes; the maintained runners are
benchmarks.bench (cleancompact bench), benchmarks.zoo, benchmarks.unseen_zoo, benchmarks.speed and
benchmarks.sweep_defend (the tuning sweeps, scored on the val half)."""
