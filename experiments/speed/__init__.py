"""Speed tools: compile time, the cold demo, CPU probes and profiles, the PyTorch reference loop."""
