"""`python -m prefixcap`: the `prefixcap` command, for launchers that run a module (torchrun, accelerate launch)."""

from prefixcap.cli import main

if __name__ == "__main__":
    main()
