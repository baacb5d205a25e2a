"""ape scripts (`ape run <name> <command>`); a package so that they share `scripts._common`."""
