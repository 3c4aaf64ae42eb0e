"""What LMI containers read: serving.properties, the loadable-tree check, sizing plans."""
