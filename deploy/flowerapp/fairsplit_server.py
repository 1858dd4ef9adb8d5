"""ServerApp component of the fairsplit Flower App: the developer's training driver."""

import fairsplit.developer.serverapp as _serverapp

app = _serverapp.app
