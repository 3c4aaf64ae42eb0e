"""`lmi-compile batch`: many compile jobs across GPU and Inferentia machines, scheduled by Ray."""
