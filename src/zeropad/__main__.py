from zeropad.cli import main

main()
