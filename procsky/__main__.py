from procsky.cli import main

main(prog_name="procsky")
