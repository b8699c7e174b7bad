"""Pure renderers: settings + topology in, config files (bytes) out. No Pulumi imports here."""
