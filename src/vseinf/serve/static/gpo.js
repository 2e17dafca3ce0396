// The GPO page: the header's gallery line, as on the search page.
"use strict";

loadGalleryInfo().catch(() => { /* the plots below still load */ });
