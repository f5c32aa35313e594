"""The packaged YAML configs (`povid ls` lists them; recipes resolve names here)."""
