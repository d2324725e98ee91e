"""Data: the image tree, dataset checks and splits, conversation records and question sets."""
