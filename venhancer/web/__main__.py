from venhancer.web.server import main

raise SystemExit(main())
