from django.urls import path

from runs import views

urlpatterns = [
    path("", views.start_run, name="start-run"),
]
