from attnzoo.cli import run

run()
