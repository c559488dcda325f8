"""The ``report`` stage (``report``): plots and markdown; runs ranked on the sets they share
(``runs``) and the retention section (``retention``)."""
