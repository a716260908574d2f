"""``python -m freezekit``: the same as the ``freezekit`` command."""

from .cli import main

if __name__ == "__main__":
    main()
