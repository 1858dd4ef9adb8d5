"""ServerApp component of the fairsplit Flower App: the developer's training driver."""

import developer.serverapp as _serverapp

app = _serverapp.app
