"""Multi-task training for BAM!: several tasks in one run of a shared encoder."""
