"""`python -m rankgate.cli`, as the `rankgate` script."""

from rankgate.cli.main import main

if __name__ == "__main__":
    main()
