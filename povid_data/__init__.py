"""POVID data: datasets, message and image transforms, dispreferred-data generation."""
