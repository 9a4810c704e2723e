"""URLs of the project: the run API of the ``runs`` app."""

from django.urls import include, path

urlpatterns = [
    path("runs/", include("runs.urls")),
]
