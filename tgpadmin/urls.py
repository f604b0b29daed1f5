from django.contrib import admin
from django.urls import path
from django.views.generic import RedirectView

from updates.metrics_view import metrics

admin.site.site_header = "tgpadmin"
admin.site.site_title = "tgpadmin"
admin.site.index_title = "Fleet updates"

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="admin:index", permanent=False)),
    path("admin/", admin.site.urls),
    # Prometheus's default metrics_path; a token or a permitted user (updates/metrics_view.py).
    path("metrics", metrics, name="metrics"),
]
