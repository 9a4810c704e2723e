"""URLs of the project: the run API of the ``runs`` app, whose errors are JSON."""

from django.urls import include, path

urlpatterns = [
    path("", include("runs.urls")),
]

# Django's own error pages are HTML. These views return JSON instead, unless
# DEBUG is on, when Django shows its debug pages.
handler400 = "runs.views.bad_request"
handler403 = "runs.views.permission_denied"
handler404 = "runs.views.not_found"
handler500 = "runs.views.server_error"
