from vlmlabel.cli import main

main()
