"""Extensions shipped with trioproxy, as worked examples of :mod:`trioproxy.extensions`."""
