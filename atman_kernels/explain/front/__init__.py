"""Front ends: one per kind of model, each turning a user's inputs and target into a
:class:`.base.Prepared` (task, units, fields) that the engine runs (:mod:`..engine`)."""
