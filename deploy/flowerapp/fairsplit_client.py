"""ClientApp component of the fairsplit Flower App: the auditor's evaluator."""

import fairsplit.auditor.clientapp as _clientapp

app = _clientapp.app
