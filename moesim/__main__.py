from moesim.cli import run

run()
