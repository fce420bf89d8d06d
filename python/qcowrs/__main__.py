from qcowrs.cli import main

raise SystemExit(main())
