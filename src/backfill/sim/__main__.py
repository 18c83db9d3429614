"""`python -m backfill.sim ...`: the simulator's command line without the backfill CLI."""

import typer

from backfill.sim.cli import sim_command

typer.run(sim_command)
