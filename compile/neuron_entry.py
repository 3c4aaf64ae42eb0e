"""`python -m lmi_compile.neuron_entry`: the documented Neuron compile entry point (see neuron/entry.py)."""

from lmi_compile.neuron.entry import main

if __name__ == "__main__":
    main()
