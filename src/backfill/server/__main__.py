"""`python -m backfill.server serve|users ...`: the service's commands without the main CLI."""

from backfill.server.cli import main

main()
