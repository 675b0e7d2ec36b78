"""Task-based flat regions (Phan et al. 2022): per-task SAM for multi-task
training and SAM fine-tuning of task vectors (`sam`, `objective`, `bench`)."""
