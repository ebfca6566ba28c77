"""`python -m marketplace.cli`: the `marketplace` command."""
from marketplace.cli.main import main

main()
