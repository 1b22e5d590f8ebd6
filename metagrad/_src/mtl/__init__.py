"""Multi-task gradient aggregators; import them from `metagrad`."""
