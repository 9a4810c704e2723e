from django.urls import path

from runs import views

# Each route also matches without its trailing slash. Otherwise Django's
# APPEND_SLASH would respond to "POST /runs" with a redirect that drops the
# body, or raise an error when DEBUG is on.
urlpatterns = [
    path("runs/", views.start_run, name="start-run"),
    path("runs", views.start_run),
    path("runs/<str:run_id>/", views.show_run, name="show-run"),
    path("runs/<str:run_id>", views.show_run),
]
