"""Everything that learns without labels: backbone, objectives, the one trainer, recipes."""
