"""Recipes: multi-stage procedures built on the one training path (BAM!: teachers, their
predictions, the multi-task student, fine-tuning)."""
