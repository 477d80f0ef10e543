"""The launcher: inside the allocation, starts the VMs, shows progress, runs the shell."""
