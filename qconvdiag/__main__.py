from qconvdiag.cli import main

main()
