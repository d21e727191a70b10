"""The run spine under every command: configs as data, their flags, run folders."""
