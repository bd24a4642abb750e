from meshlet.cli import main

raise SystemExit(main())
