"""The Neuron backend: split weights, the compile boundary (entry.py) and the layouts LMI loads."""
