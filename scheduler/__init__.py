"""vnodes.scheduler: what decides (master, launchers, plugins) and the command line."""
