from lbstack.cli import main

main()
