"""The training system: configuration and presets, the run directory, the
loop. Imports core, workloads and analysis."""
