"""Tools that read run directories: the landscape measures, results tables,
the flatness report and plots. Imports every layer below cli."""
