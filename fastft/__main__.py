from fastft.cli import main

raise SystemExit(main())
